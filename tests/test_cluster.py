"""cluster.py: local workers of both kinds get one environment; 'auto' never waits for workers: without one it is
decided by each tile's worker."""
import os
import sys
import types

import dask
import pytest

from cntk_gram.pipeline import cluster
from cntk_gram.pipeline.config import build_config
from cntk_gram.pipeline.run import submit


class Recorder:
    """Stands in for a cluster class; records what a worker process would get as its environment."""

    def __init__(self, seen, *, honours_env_option):
        self.seen, self.honours_env_option = seen, honours_env_option

    def __call__(self, **kwargs):
        env = dict(dask.config.get("distributed.nanny.pre-spawn-environ"))
        if self.honours_env_option:
            env.update(kwargs.get("env") or {})
        self.seen.append({"env": env, "kwargs": kwargs})
        return object()


def test_gpu_and_cpu_local_workers_get_the_same_environment(monkeypatch):
    import distributed

    seen = []
    # dask-cuda sets each worker's `env` option to CUDA_VISIBLE_DEVICES alone, so the stand-in ignores it
    fake = types.ModuleType("dask_cuda")
    fake.LocalCUDACluster = Recorder(seen, honours_env_option=False)
    fake_utils = types.ModuleType("dask_cuda.utils")
    fake_utils.get_n_gpus = lambda: 2
    monkeypatch.setitem(sys.modules, "dask_cuda", fake)
    monkeypatch.setitem(sys.modules, "dask_cuda.utils", fake_utils)
    # a BLAS reads its thread count when the worker imports it, before the `env` option is applied: only the
    # pre-spawn environment counts, for CPU workers too
    monkeypatch.setattr(distributed, "LocalCluster", Recorder(seen, honours_env_option=False))
    monkeypatch.setattr(cluster.os, "cpu_count", lambda: 8)
    config = build_config({"cluster": {"workers": 4}}).cluster

    cluster.local_cluster(cluster=config, backend="gpu")
    cluster.local_cluster(cluster=config, backend="cpu")
    gpu, cpu = seen
    assert gpu["env"]["NUMBA_NUM_THREADS"] == "4" and cpu["env"]["NUMBA_NUM_THREADS"] == "2"  # 8 cores / workers
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        assert str(gpu["env"][name]) == str(cpu["env"][name]) == "1", name
    # OpenBLAS (fc's matrix product) gets the numba threads, with a short spin so it frees them for numba
    for env in (gpu["env"], cpu["env"]):
        assert env["OPENBLAS_NUM_THREADS"] == env["NUMBA_NUM_THREADS"]
        assert env["OPENBLAS_THREAD_TIMEOUT"] == cluster.BLAS_SPIN
    assert cpu["kwargs"]["n_workers"] == 4 and "n_workers" not in gpu["kwargs"]  # one worker per GPU
    # task slots: three per GPU worker (host work overlaps the serialised kernels), one per CPU worker
    assert gpu["kwargs"]["threads_per_worker"] == 3 and cpu["kwargs"]["threads_per_worker"] == 1
    # the configuration is only changed while the GPU cluster is made
    assert "NUMBA_NUM_THREADS" not in dask.config.get("distributed.nanny.pre-spawn-environ")


@pytest.mark.parametrize("slots, backend, expected", [
    (None, "gpu", 3), (None, "cpu", 1), (1, "gpu", 1), (2, "cpu", 2),
])
def test_task_slots_default_per_backend_unless_given(slots, backend, expected):
    config = build_config({"cluster": {"slots": slots}}).cluster
    assert cluster.task_slots(config, backend=backend) == expected


def test_local_cpu_cluster_runs_the_configured_slots_per_worker():
    from distributed import Client

    config = build_config({"cluster": {"workers": 1, "slots": 2, "threads": 1}}).cluster
    with cluster.local_cluster(cluster=config, backend="cpu") as local, Client(local) as client:
        assert list(client.nthreads().values()) == [2]


def test_starting_local_workers_leaves_this_process_environment_as_it_was(monkeypatch):
    """The nanny sets the workers' environment in the client's own process; a changed NUMBA_NUM_THREADS there
    breaks numba's next compile once its threads run."""
    from distributed import Client

    monkeypatch.setenv("NUMBA_NUM_THREADS", "7")
    monkeypatch.delenv("OPENBLAS_THREAD_TIMEOUT", raising=False)
    config = build_config({"cluster": {"workers": 1, "threads": 1}}).cluster
    with cluster.local_cluster(cluster=config, backend="cpu") as local, Client(local) as client:
        worker_env = client.run(lambda: {k: os.environ.get(k) for k in ("NUMBA_NUM_THREADS",)})
        assert list(worker_env.values()) == [{"NUMBA_NUM_THREADS": "1"}]
        assert os.environ["NUMBA_NUM_THREADS"] == "7"
        assert "OPENBLAS_THREAD_TIMEOUT" not in os.environ


def test_auto_backend_on_a_cluster_without_workers_is_decided_by_each_tile_worker(cifar_format_root, tmp_path):
    """`submit` with backend auto to a cluster whose workers have not joined (SLURM worker jobs still queued)
    returns at once with the tiles queued undecided; the worker that joins later computes them, on the CPU here."""
    import json
    import time

    from distributed import LocalCluster

    from cntk_gram.pipeline.store import tile_status

    config = build_config({"data": {"root": str(cifar_format_root), "train": 20, "test": 0},
                           "kernel": {"archs": ["vanilla"], "depths": [2]}, "tiles": {"size": 10},
                           "backend": "auto", "store": str(tmp_path / "s.zarr")})
    with LocalCluster(n_workers=0, processes=False, dashboard_address=":0") as empty:
        summary = submit(config, scheduler=empty.scheduler_address)
        assert summary["backend"] == "auto" and summary["tiles_submitted"] == 3
        assert tile_status(config.store)[0] == set()
        empty.scale(1)
        while len(tile_status(config.store)[0]) < 3:  # paced by the completion records; pytest-timeout bounds it
            time.sleep(0.05)
    records = (tmp_path / "s.zarr" / "tiles" / "done").glob("*/zarr.json")
    assert {json.loads(r.read_text())["attributes"]["backend"] for r in records} == {"cpu"}