"""Helpers for tests that run real processes on loopback: the `cntk` CLI, a Dask scheduler, workers.

Every process gets PYTHONPATH = the repository (the package need not be installed) and one numba thread.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml
import zarr

REPO = Path(__file__).resolve().parents[1]


def proc_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    env.update(extra)
    return env


def cntk_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "cntk_gram.pipeline.cli", *map(str, args)]


def cntk(*args: str, timeout: float = 120, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    """Run `cntk ARGS` to completion; stdout and stderr merged into .stdout."""
    return subprocess.run(cntk_command(*args), cwd=cwd or REPO, env=proc_env(**env), timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def write_config(path: Path, *, cifar_root: Path, store: Path, train: int = 40, test: int = 20,
                 tile: int = 20, depths=(3,), archs=("vanilla",), kinds=("ntk", "nngp"),
                 backend: str = "cpu", **extra) -> Path:
    """A small YAML config; `extra` adds top-level keys (e.g. cluster={...})."""
    raw = {"data": {"source": "cifar10", "root": str(cifar_root), "train": train, "test": test,
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


def wait_for_port(port: int, *, proc: subprocess.Popen | None = None, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port} after {timeout} s")


def wait_for_workers(address: str, n: int, timeout: float = 90) -> None:
    from distributed import Client

    with Client(address, timeout="20s", set_as_default=False) as client:
        client.wait_for_workers(n, timeout=timeout)


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
    from cntk_gram.pipeline.store import tile_status

    return tile_status(store)[0]


def finished_store(root: Path, cifar_root: Path, *, train: int = 40, test: int = 20, tile: int = 20):
    """A store computed to the end by `cntk run` (one worker, one thread) under root; returns (store, config)."""
    store = root / "g.zarr"
    config = write_config(root / "g.yaml", cifar_root=cifar_root, store=store, train=train, test=test, tile=tile)
    result = cntk("run", config, "--workers", "1", "--threads", "1", "--no-progress")
    assert result.returncode == 0, result.stdout
    return store, config
