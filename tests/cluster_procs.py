"""Helpers for tests that run real processes on loopback: the `cntk` CLI, a Dask scheduler, workers.

Every process gets this interpreter's environment (the installed package: `pip install -e .`) and one numba thread.
No helper here waits for a number of seconds: each waits for progress (a port that listens, workers that
joined, completion records) and fails at once when a process it depends on has exited; the wall-clock
bound of a whole test is pytest-timeout's (pyproject.toml).
"""
from __future__ import annotations

import atexit
import functools
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def interpreter_commands() -> Path:
    """A folder whose `dask` and `cntk` run this interpreter (`python -m ...`), removed at exit. Its own bin folder is
    not enough: a virtual environment that inherits Dask from its base Python has no `dask` script, and the base's
    would run without the package installed here."""
    folder = Path(tempfile.mkdtemp(prefix="cntk-test-bin-"))
    atexit.register(shutil.rmtree, folder, True)
    for name, module in (("dask", "dask"), ("cntk", "cntk_gram.pipeline.cli")):
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m {module} "$@"\n')
        script.chmod(0o755)
    return folder


def proc_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    # scripts that call `dask` or `cntk` get this interpreter's environment, activated or not
    env["PATH"] = os.pathsep.join(filter(None, [str(interpreter_commands()), str(Path(sys.executable).parent),
                                                env.get("PATH")]))
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def cntk_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cntk_gram.pipeline.cli", *map(str, args)]


def cntk(*args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run `cntk ARGS` to completion; stdout and stderr merged into .stdout."""
    return subprocess.run(cntk_command(*args), cwd=cwd or REPO, env=proc_env(**env),
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def cntk_json(*args: str, cwd: Path | None = None, **env: str) -> dict:
    """Run `cntk ARGS --json` to completion; it must succeed; returns the one JSON object of its stdout."""
    result = subprocess.run(cntk_command(*args, "--json"), cwd=cwd or REPO, env=proc_env(**env),
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def write_config(path: Path, *, data_root: Path, store: Path, train: int = 40, test: int = 20,
                 tile: int = 20, depths=(3,), archs=("vanilla",), kinds=("ntk", "nngp"),
                 backend: str = "cpu", **extra) -> Path:
    """A small YAML config; `extra` adds top-level keys (e.g. cluster={...})."""
    raw = {"data": {"source": "cifar10", "root": str(data_root), "train": train, "test": test,
                    "download": False},
           "kernel": {"archs": list(archs), "kinds": list(kinds), "depths": list(depths)},
           "tiles": {"size": tile}, "backend": backend, "store": str(store), **extra}
    path.write_text(yaml.safe_dump(raw))
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_scheduler(port: int, log: Path) -> subprocess.Popen:
    """`dask scheduler` on 127.0.0.1:port; returns once it accepts connections."""
    proc = subprocess.Popen([sys.executable, "-m", "distributed.cli.dask_scheduler", "--host", "127.0.0.1",
                             "--port", str(port), "--no-dashboard"],
                            env=proc_env(), stdout=log.open("ab"), stderr=subprocess.STDOUT,
                            start_new_session=True)
    wait_for_port(port, proc=proc)
    return proc


def start_worker(address: str, log: Path, *, preload: Path | None = None, **env: str) -> subprocess.Popen:
    """One single-threaded worker process without a nanny (a SIGKILL kills it for good)."""
    args = [sys.executable, "-m", "distributed.cli.dask_worker", address, "--nthreads", "1", "--no-nanny",
            "--no-dashboard", "--host", "127.0.0.1", "--death-timeout", "30"]
    if preload is not None:
        args += ["--preload", str(preload)]
    return subprocess.Popen(args, cwd=REPO, env=proc_env(**env), stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


POLL_S = 0.05  # how often a waiting helper looks again; never a limit


def wait_until(condition, *, what: str, procs=()) -> None:
    """Poll `condition()` until it is true. No time limit (pytest-timeout bounds the test), but a clear
    failure naming `what` as soon as one of `procs` (subprocess.Popen) has exited: then it may never hold."""
    while not condition():
        for proc in procs:
            if proc is not None and proc.poll() is not None:
                raise AssertionError(f"waiting for {what}: {proc.args[:4]}... exited with {proc.returncode}")
        time.sleep(POLL_S)


def wait_for_port(port: int, *, proc: subprocess.Popen | None = None) -> None:
    def listens() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    wait_until(listens, what=f"a listener on port {port}", procs=[proc])


def wait_for_workers(address: str, n: int, *, procs=()) -> None:
    """Until the scheduler at `address` has n workers (it must be listening already)."""
    from distributed import Client

    with Client(address, set_as_default=False) as client:
        wait_until(lambda: len(client.scheduler_info(n_workers=-1)["workers"]) >= n,
                   what=f"{n} workers at {address}", procs=procs)


def wait_for_records(store: Path, n: int, *, procs=()) -> set[tuple[int, int]]:
    """Until the store has at least n tile completion records; returns the done tiles then."""
    wait_until(lambda: len(done_tiles(store)) >= n, what=f"{n} completion records in {store}", procs=procs)
    return done_tiles(store)


def stop(*procs: subprocess.Popen | None) -> None:
    """SIGKILL each process (tests start every process in its own session) and reap it."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            with _ignore_gone():
                os.killpg(proc.pid, signal.SIGKILL)
    for proc in procs:
        if proc is not None:
            with _ignore_gone():
                proc.wait(timeout=30)


class _ignore_gone:
    def __enter__(self):
        return self

    def __exit__(self, kind, value, tb):
        return kind is not None and issubclass(kind, (ProcessLookupError, PermissionError))


GATE_PRELOAD = REPO / "tests" / "tile_gate.py"  # a Dask worker preload


class TileLog:
    """The worker preload's view (tests/tile_gate.py): a log of tile starts and ends, a gate that caps the
    number of starts, a hold file that parks finished tiles before their completion record."""

    def __init__(self, tmp_path: Path):
        self.path, self.gate, self.hold = tmp_path / "tiles.log", tmp_path / "tiles.gate", tmp_path / "tiles.hold"

    def env(self) -> dict[str, str]:
        """What a worker needs to load the preload and find the files."""
        return {"CNTK_TILE_LOG": str(self.path), "CNTK_TILE_GATE": str(self.gate), "CNTK_TILE_HOLD": str(self.hold)}

    def embedded_env(self) -> dict[str, str]:
        """env() plus the preload for the workers of `cntk run`'s embedded cluster (Dask config by env)."""
        return {**self.env(), "DASK_DISTRIBUTED__WORKER__PRELOAD": f'["{GATE_PRELOAD}"]'}

    def starts(self) -> int:
        return sum(event == "start" for event, _, _ in self.events())

    def events(self) -> list[tuple[str, tuple[int, int], int]]:
        """(event, tile, worker pid) for every complete line, in the order written."""
        if not self.path.exists():
            return []
        events = []
        for line in self.path.read_text().splitlines(keepends=True):
            parts = line.split()
            if line.endswith("\n") and len(parts) == 4:
                events.append((parts[0], (int(parts[1]), int(parts[2])), int(parts[3])))
        return events

    def allow_starts(self, n: float) -> None:
        """Let at most n tile computations start in all (inf: no limit)."""
        tmp = self.gate.with_suffix(".tmp")
        tmp.write_text(str(n) if n != float("inf") else str(10**9))
        tmp.replace(self.gate)


def gram_arrays(store: Path) -> dict[str, np.ndarray]:
    """Every gram/{kernel}/depth-{D} array of a store, read whole (small test stores only)."""
    group = zarr.open_group(store, mode="r")
    out = {}
    for kernel in sorted(group["gram"].group_keys()):
        for depth in sorted(group[f"gram/{kernel}"].array_keys()):
            out[f"gram/{kernel}/{depth}"] = group[f"gram/{kernel}/{depth}"][:]
    return out


def assert_bit_identical(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype == np.float32, name
        assert np.array_equal(a[name].view(np.uint32), b[name].view(np.uint32)), f"{name} differs"


def done_tiles(store: Path) -> set[tuple[int, int]]:
    """Tiles with a complete record; none while the store is not created yet."""
    from cntk_gram.pipeline.store import tile_status

    if not (Path(store) / "zarr.json").exists():
        return set()
    return tile_status(store)[0]


def finished_store(root: Path, data_root: Path, *, train: int = 40, test: int = 20, tile: int = 20):
    """A store computed to the end by `cntk run` (one worker, one thread) under root; returns (store, config)."""
    store = root / "g.zarr"
    config = write_config(root / "g.yaml", data_root=data_root, store=store, train=train, test=test, tile=tile)
    result = cntk("run", config, "--workers", "1", "--threads", "1", "--no-progress")
    assert result.returncode == 0, result.stdout
    return store, config


def store_snapshot(store: Path) -> dict[str, str]:
    """sha256 of every file of a store by relative path: equal snapshots = a byte-identical store."""
    return {str(p.relative_to(store)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(store).rglob("*")) if p.is_file()}
