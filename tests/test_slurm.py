"""The deploy/slurm scripts and dask-jobqueue on a real SLURM: deploy/slurm/local-slurm.sh starts munged, slurmctld and
slurmd on this machine (one node declared with 32 CPUs and 4 file-backed GPUs, so the unchanged GPU `#SBATCH` lines
schedule) and the jobs run CPU workers (CNTK_WORKER_KIND=cpu).

Every test launches the scripts from a folder that stands for the repository root (deploy/ linked into it, its own
runs/), computes a 40 + 20 image store in 18 tiles and compares its Gram bit for bit with an embedded `cntk run` of
the same config. Tests are paced by completion records, job states and a worker preload (tests/tile_gate.py) that
caps tile starts and can park a finished tile before its record; no verdict waits for a number of seconds.
Where SLURM cannot start the tests skip with one reason; CNTK_REQUIRE=slurm makes that a failure.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from cluster_procs import (REPO, TileLog, assert_bit_identical, cntk, done_tiles, free_port, gram_arrays, proc_env,
                           write_config)
from cntk_gram.pipeline.cluster import WORKER_ASK_S
from conftest import required

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

LOCAL_SLURM = REPO / "deploy" / "slurm" / "local-slurm.sh"
TRAIN, TEST, TILE, TILES = 40, 20, 10, 18  # 4 + 2 row blocks: 10 train x train tiles and 8 train x test
ENDED = {"COMPLETED", "CANCELLED", "FAILED", "TIMEOUT", "PREEMPTED", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
         "DEADLINE"}
POLL_S = 1.0  # how often SLURM is asked again: a pace, never a limit (pytest-timeout bounds each test)


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    """The environment (SLURM_CONF) of a local SLURM for the whole session; stopped, jobs and daemons, at its end."""
    directory = tmp_path_factory.mktemp("slurm")
    started = subprocess.run(["bash", str(LOCAL_SLURM), "start", str(directory)], capture_output=True, text=True)
    if started.returncode != 0:
        why = (started.stderr.strip().splitlines() or [f"exit status {started.returncode}"])[-1]
        reason = f"a local SLURM cannot start here ({why})"
        if "slurm" in required():
            pytest.fail(f"{reason} (CNTK_REQUIRE=slurm: the SLURM tests may not be skipped)", pytrace=False)
        pytest.skip(reason)
    try:
        yield {"SLURM_CONF": str(directory / "slurm.conf")}
    finally:
        subprocess.run(["bash", str(LOCAL_SLURM), "stop", str(directory)], capture_output=True)


@pytest.fixture(scope="module")
def embedded(cifar_format_root, tmp_path_factory) -> dict:
    """The same config computed by an embedded `cntk run` and solved by `cntk solve`: {'gram', 'accuracies'}."""
    root = tmp_path_factory.mktemp("embedded")
    store = root / "g.zarr"
    config = write_config(root / "g.yaml", data_root=cifar_format_root, store=store, train=TRAIN, test=TEST,
                          tile=TILE, backend="cpu")
    computed = cntk("run", config, "--workers", "1", "--threads", "1", "--no-progress")
    assert computed.returncode == 0, computed.stdout
    solved = cntk("solve", store, "--device", "cpu")
    assert solved.returncode == 0, solved.stdout
    return {"gram": gram_arrays(store), "accuracies": accuracies(root / "g-report")}


def accuracies(report: Path) -> dict:
    """(kernel, depth) -> ridgeless and validated accuracy and the ridgeless confusion matrix of a results.json."""
    rows = json.loads((report / "results.json").read_text())["rows"]
    return {(r["kernel"], r["depth"]): (r["ridgeless"]["accuracy"], r["validated"]["accuracy"],
                                        r["ridgeless"]["confusion"]) for r in rows}


class Launch:
    """One run's world: a folder standing for the repository root, its config and store, the environment of its
    jobs (CPU workers, this run's scheduler port, the tile gate preload), and SLURM queries."""

    def __init__(self, tmp_path: Path, slurm: dict, data_root: Path, **env: str):
        self.root = tmp_path / "root"
        self.root.mkdir()
        (self.root / "deploy").symlink_to(REPO / "deploy")
        self.store = tmp_path / "g.zarr"
        self.config = write_config(tmp_path / "g.yaml", data_root=data_root, store=self.store, train=TRAIN,
                                   test=TEST, tile=TILE, backend="auto")
        self.scheduler_file = self.root / "runs" / "scheduler.json"
        self.tiles = TileLog(tmp_path)
        self.env = proc_env(**slurm, **self.tiles.embedded_env(), CNTK_WORKER_KIND="cpu", CNTK_CPU_WORKERS="1",
                            CNTK_SCHEDULER_PORT=str(free_port()), CNTK_DASHBOARD_PORT="0", CNTK_STORE_POLL="2",
                            CNTK_WALLTIME_MARGIN="30", CNTK_LIFETIME_STAGGER="0", **env)
        self.jobs: dict[str, str] = {}

    def run(self, *args, **extra) -> subprocess.CompletedProcess:
        """A command in the root folder with the jobs' environment; stdout and stderr merged."""
        return subprocess.run([str(a) for a in args], cwd=self.root, env={**self.env, **extra}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT)

    def launch(self, nodes: int = 1, rounds: int = 2, **extra) -> subprocess.CompletedProcess:
        """deploy/slurm/launch.sh CONFIG NODES ROUNDS; self.jobs gets 'scheduler', 'round-K' and 'solve'."""
        result = self.run("bash", "deploy/slurm/launch.sh", self.config, nodes, rounds, **extra)
        for name, job in re.findall(r"^(scheduler|worker round \d+|solve):? job (\d+)", result.stdout, re.M):
            self.jobs[name.replace("worker round ", "round-")] = job
        return result

    def sbatch(self, *args) -> str:
        result = self.run("sbatch", "--parsable", "--export=ALL", *args)
        assert result.returncode == 0, result.stdout
        return result.stdout.strip().split(";")[0]

    def job(self, job: str) -> dict[str, str]:
        """`scontrol show job` of a job (the first task of an array) as {field: value}; {} once SLURM forgot it."""
        shown = self.run("scontrol", "show", "job", "--oneliner", job)
        if shown.returncode != 0 or not shown.stdout.strip():
            return {}
        return dict(re.findall(r"(\w+)=(\S*)", shown.stdout.splitlines()[0]))

    def state(self, job: str) -> str:
        return self.job(job).get("JobState", "GONE")

    def queued(self) -> list[str]:
        """The jobs SLURM still has pending or running (the whole local cluster: one test runs at a time)."""
        return self.run("squeue", "--noheader", "--format", "%i %T").stdout.split("\n")[:-1]

    def wait(self, condition, what: str) -> None:
        """Until condition() holds; fails at once when SLURM has no job left that could make it hold."""
        while not condition():
            if not self.queued() and not condition():
                raise AssertionError(f"waiting for {what}: no SLURM job is left\n{self.logs()}")
            time.sleep(POLL_S)

    def wait_state(self, job: str, states: set[str]) -> str:
        self.wait(lambda: self.state(job) in states, f"job {job} to be {'/'.join(sorted(states))}")
        return self.state(job)

    def wait_for_tiles(self, n: int) -> None:
        self.wait(lambda: len(done_tiles(self.store)) >= n, f"{n} completion records")

    def log(self, pattern: str) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted((self.root / "runs" / "slurm").glob(pattern)))

    def logs(self) -> str:
        """The tail of every job log, for failure messages."""
        return "\n".join(f"--- {p.name}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-15:])
                         for p in sorted((self.root / "runs" / "slurm").glob("*.out")))

    def starts(self) -> dict[tuple[int, int], int]:
        """How often each tile's computation started (the preload's log)."""
        counts: dict[tuple[int, int], int] = {}
        for event, tile, _ in self.tiles.events():
            if event == "start":
                counts[tile] = counts.get(tile, 0) + 1
        return counts

    def cut_tiles(self) -> list[tuple[tuple[int, int], int]]:
        """(tile, pid) of every computation that started and never ended."""
        open_ = [(tile, pid) for event, tile, pid in self.tiles.events() if event == "start"]
        for event, tile, pid in self.tiles.events():
            if event == "end":
                open_.remove((tile, pid))
        return open_


@pytest.fixture
def launch(slurm, cifar_format_root, tmp_path):
    """A Launch; at the end every job on the local SLURM is cancelled and gone."""
    run = Launch(tmp_path, slurm, cifar_format_root)
    yield run
    run.run("scancel", "--user", str(os.getuid()))
    deadline = time.time() + 120  # clean-up, not a verdict: a job that will not leave is the next test's failure
    while run.queued() and time.time() < deadline:
        time.sleep(POLL_S)


def alive(pid: int) -> bool:
    """Whether process pid still runs (a zombie does not: it can write nothing)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def assert_complete_and_identical(run: Launch, embedded: dict) -> None:
    assert len(done_tiles(run.store)) == TILES
    verified = cntk("verify", run.store)
    assert verified.returncode == 0 and "0 problems" in verified.stdout, verified.stdout
    assert_bit_identical(gram_arrays(run.store), embedded["gram"])


def test_launch_computes_verifies_and_solves(launch, embedded):
    """a, 3, 4: launch.sh CONFIG 1 2 with CPU workers: the store completes bit-identical to an embedded run, the
    solve job writes the same accuracies into the report folder beside the store and ends the scheduler job; the scheduler spoke TLS."""
    launched = launch.launch(nodes=1, rounds=2)
    assert launched.returncode == 0, launched.stdout
    assert set(launch.jobs) == {"scheduler", "round-0", "round-1", "solve"}, launched.stdout
    assert launch.wait_state(launch.jobs["solve"], ENDED) == "COMPLETED", launch.logs()
    assert_complete_and_identical(launch, embedded)
    assert accuracies(launch.store.parent / "g-report") == embedded["accuracies"]
    assert "report:" in launch.log("cntk-solve-*.out")
    assert launch.wait_state(launch.jobs["scheduler"], ENDED) == "CANCELLED"  # ended by the solve job
    assert re.search(r"Scheduler at:\s+tls://", launch.log("cntk-scheduler-*.out"))
    tls = launch.root / "runs" / "scheduler-tls"
    assert tls.stat().st_mode & 0o777 == 0o700
    assert {p.name: p.stat().st_mode & 0o777 for p in tls.iterdir()} == {"cert.pem": 0o600, "key.pem": 0o600}


def test_requeued_worker_job_finishes_the_store(launch, embedded):
    """b: `scontrol requeue` of the worker job while one tile is cut mid-way (its chunks written, no record yet):
    when the job comes back the store completes bit-identical, only that tile computed twice."""
    launch.tiles.allow_starts(3)
    assert launch.launch(nodes=1, rounds=1).returncode == 0
    workers = launch.jobs["round-0"]
    launch.wait_for_tiles(3)
    launch.tiles.hold.touch()  # the next tile waits before its completion record
    launch.tiles.allow_starts(4)
    launch.wait(lambda: any(event == "hold" for event, _, _ in launch.tiles.events()), "a tile held before its record")
    ((cut, holder),) = [(tile, pid) for event, tile, pid in launch.tiles.events() if event == "hold"]
    assert launch.run("scontrol", "requeue", workers).returncode == 0
    launch.wait_state(workers, {"PENDING"})
    # SLURM may say PENDING while it still kills the job's processes: the held tile stays held until they are gone
    launch.wait(lambda: not alive(holder), f"the worker process {holder} holding tile {cut} to be gone")
    launch.tiles.hold.unlink()
    launch.tiles.allow_starts(float("inf"))
    # a requeued job waits ~2 minutes (BeginTime) before it may start again: let it start now
    assert launch.run("scontrol", "update", f"JobId={workers}", "StartTime=now").returncode == 0
    launch.wait_for_tiles(TILES)
    assert launch.job(workers)["Restarts"] == "1"
    assert_complete_and_identical(launch, embedded)
    starts = launch.starts()
    assert starts.pop(cut) == 2 and set(starts.values()) == {1}, starts  # redone: the cut tile, no other


def test_walltime_retires_workers_before_slurm_kills_them(launch, embedded):
    """c: worker jobs with a 3-minute walltime: the first round's workers retire on their own before SLURM's limit
    (the job COMPLETED, not TIMEOUT), no tile is cut or computed twice, and the second round finishes the store.
    The margin (90 s) covers what the lifetime does not: the workers' start-up (imports, up to ~40 s on a loaded
    2-core machine) and their shutdown."""
    launch.tiles.allow_starts(5)
    launched = launch.launch(nodes=1, rounds=2, CNTK_WORKER_SBATCH="--time=3", CNTK_WALLTIME_MARGIN="90")
    assert launched.returncode == 0, launched.stdout
    first, second = launch.jobs["round-0"], launch.jobs["round-1"]
    launch.wait_for_tiles(5)
    assert launch.wait_state(first, ENDED) == "COMPLETED", launch.logs()
    assert "worker-lifetime-reached" in launch.log(f"cntk-workers-{first}_0.out")
    assert len(done_tiles(launch.store)) == 5
    launch.tiles.allow_starts(float("inf"))
    launch.wait_for_tiles(TILES)
    assert launch.state(second) in {"RUNNING", "COMPLETING", "COMPLETED"}
    assert_complete_and_identical(launch, embedded)
    assert launch.cut_tiles() == []
    assert launch.starts() == {tile: 1 for tile in done_tiles(launch.store)}  # 18 tiles, each computed once


def test_new_scheduler_job_after_scheduler_loss_finishes_the_store(launch, embedded):
    """d: `scancel` of the scheduler job mid-run: the worker job's workers wait for a scheduler; a new scheduler job
    plus the same `cntk submit` completes the store, bit-identical, no tile computed twice."""
    launch.tiles.allow_starts(5)
    assert launch.launch(nodes=1, rounds=1).returncode == 0
    workers = launch.jobs["round-0"]
    launch.wait_for_tiles(5)
    assert launch.run("scancel", launch.jobs["scheduler"]).returncode == 0
    launch.wait(lambda: "ended with work left" in launch.log(f"cntk-workers-{workers}_0.out"),
                "the workers to notice the scheduler is gone")
    scheduler = launch.sbatch("deploy/slurm/scheduler.sbatch")
    launch.wait(launch.scheduler_file.exists, "the new scheduler's file")
    submitted = launch.run("cntk", "submit", launch.config, "--scheduler-file", launch.scheduler_file)
    assert submitted.returncode == 0, submitted.stdout
    launch.tiles.allow_starts(float("inf"))
    launch.wait_for_tiles(TILES)
    assert launch.state(scheduler) == "RUNNING" and launch.job(workers)["Restarts"] == "0"
    assert_complete_and_identical(launch, embedded)
    assert launch.starts() == {tile: 1 for tile in done_tiles(launch.store)}


def test_jobqueue_cluster_computes_and_solves_a_store(launch, embedded, tmp_path):
    """e: deploy/jobqueue_cluster.py (dask-jobqueue's SLURMCluster with deploy/jobqueue.yaml, scheduler port made
    free) on the real SLURM computes the store, queues the solve job and exits; the solve job writes the report."""
    profile = yaml.safe_load((REPO / "deploy" / "jobqueue.yaml").read_text())
    profile["jobqueue"]["slurm"]["scheduler-options"] = {"port": 0, "dashboard_address": ":0"}
    (tmp_path / "jobqueue.yaml").write_text(yaml.safe_dump(profile))
    env = {k: v for k, v in launch.env.items() if not k.startswith("CNTK_TILE") and "PRELOAD" not in k}
    cluster = subprocess.run([sys.executable, "deploy/jobqueue_cluster.py", "--jobs", "1", "--profile",
                              tmp_path / "jobqueue.yaml", "--scheduler-file", launch.scheduler_file,
                              "--config", launch.config, "--solve-device", "cpu", "--poll", "2"],
                             cwd=launch.root, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    assert cluster.returncode == 0, cluster.stdout + launch.logs()
    assert "tls://" in re.search(r"^scheduler (\S+)", cluster.stdout, re.M).group(1)
    solve = re.search(r"solve job (\d+)", cluster.stdout).group(1)
    assert launch.wait_state(solve, ENDED) == "COMPLETED", launch.logs()
    assert_complete_and_identical(launch, embedded)
    assert accuracies(launch.store.parent / "g-report") == embedded["accuracies"]


def test_launch_with_backend_auto_while_workers_wait_in_the_queue(launch, embedded):
    """f, 2: another job holds the node's GPUs while launch.sh runs and longer than any wait of our code, so its
    worker jobs stay queued: launch.sh with `backend: auto` still succeeds (`cntk submit` leaves the backend to each
    tile's worker), and the store completes, on the CPU, after the other job ends."""
    holder = launch.sbatch("--gres=gpu:4", "--mem=1G", "--output=/dev/null", "--wrap", "sleep 86400")  # scancel below
    launch.wait_state(holder, {"RUNNING"})
    held_since = time.monotonic()
    launched = launch.launch(nodes=1, rounds=1)
    assert launched.returncode == 0, launched.stdout + launch.logs()
    assert "backend auto (no worker has joined yet" in launched.stdout
    # the scenario, not a verdict: the node stays held past the longest wait for workers in our code (the 60 s that
    # `cntk submit` once waited for a first worker is now cluster.WORKER_ASK_S, for a worker that has joined)
    time.sleep(max(0.0, held_since + WORKER_ASK_S + 5 - time.monotonic()))
    assert launch.state(launch.jobs["round-0"]) == "PENDING" and done_tiles(launch.store) == set()
    assert launch.state(launch.jobs["scheduler"]) == "RUNNING", launch.logs()
    assert launch.run("scancel", holder).returncode == 0
    launch.wait_for_tiles(TILES)
    assert_complete_and_identical(launch, embedded)
    backends = {json.loads(p.read_text())["attributes"]["backend"]
                for p in (launch.store / "tiles" / "done").glob("*/zarr.json")}
    assert backends == {"cpu"}
