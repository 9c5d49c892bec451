"""Dask clusters: connect to a running scheduler or start the embedded local one, set up GPU workers,
decide which tile backend the workers use, and make and find the TLS material of the clusters the deploy/ scripts
start.

TLS: every cluster deploy/ starts gets its own self-signed certificate (the cluster's CA and every member's
certificate at once) and key, in a private folder beside its scheduler file (tls_dir); the scheduler then listens on
tls:// only and requires the certificate of every peer (mutual TLS), so a client without the files cannot submit
anything. `connect` finds the files by the scheduler file (or $CNTK_TLS_DIR for --scheduler tls://...).

Every worker of the embedded cluster, CPU or GPU, gets the environment of worker_env: the thread
counts must be in place before the worker imports numba or a BLAS.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path

from cntk_gram.pipeline.config import ClusterConfig
from cntk_gram.pipeline.errors import UserError

CONNECT_TIMEOUT_S = 5
WORKER_ASK_S = 60  # how long a worker that has joined may take to say which backend 'auto' means there
TLS_CERT, TLS_KEY = "cert.pem", "key.pem"
# Tile tasks per GPU worker: the GPU backend serialises device use (workers/gpu.py, _device_lock), so the
# other slots only let tiles' host work (input read, copy to the host, store writes) overlap the current
# tile's kernels. A tile's host work (~110 ms per 1000 x 1000 tile at 5 depths) outlasts its CNTK-V
# kernels (~60 ms), so two other tiles must be in their host part at once: 3 slots
# (benchmarks/results/host-cpu-slots.json: 1/2/3/4 slots 5.2/8.3/9.0/10.1 M pairs/s on 2 cores).
GPU_SLOTS = 3


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
    security = client_security(scheduler=scheduler, scheduler_file=scheduler_file)
    try:
        client = Client(address=scheduler, scheduler_file=scheduler_file, security=security,
                        timeout=f"{CONNECT_TIMEOUT_S}s", set_as_default=set_as_default)
    except (OSError, TimeoutError, ValueError, TypeError) as exc:
        tls = " and that its TLS certificate is this cluster's" if security is not None else ""
        raise UserError(f"cannot reach the Dask scheduler at {target} within {CONNECT_TIMEOUT_S} s "
                        f"({type(exc).__name__}); check the address and that the scheduler is running{tls}") from None
    try:
        yield client
    finally:
        client.close()


def tls_dir(scheduler_file: str | os.PathLike) -> Path:
    """Where a cluster's TLS files live: beside its scheduler file, runs/scheduler.json -> runs/scheduler-tls/."""
    path = Path(scheduler_file)
    return path.with_name(f"{path.stem}-tls")


def make_tls(directory: str | os.PathLike, *, new: bool = False) -> Path:
    """A cluster's TLS material in `directory` (mode 0700): TLS_CERT, one self-signed certificate that is both the
    cluster's CA and the certificate of its scheduler, workers and clients, and TLS_KEY, its private key (both mode
    0600). Made by distributed's Security.temporary (RSA 2048, valid one year). Files already there are kept unless
    `new`. Returns the directory."""
    from distributed import Security

    directory = Path(directory)
    if not new and (directory / TLS_CERT).is_file() and (directory / TLS_KEY).is_file():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    directory.chmod(0o700)  # mkdir's mode is masked by the umask, and a folder that existed keeps its own
    made = Security.temporary()
    for name, text in ((TLS_KEY, made.tls_scheduler_key), (TLS_CERT, made.tls_scheduler_cert)):
        temporary = directory / f".{name}.tmp"
        temporary.unlink(missing_ok=True)
        fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)  # never readable by others
        with os.fdopen(fd, "w") as file:
            file.write(text)
        os.replace(temporary, directory / name)
    return directory


def tls_security(directory: str | os.PathLike):
    """A distributed Security for every role (scheduler, worker, client) from the files of make_tls, encryption
    required."""
    from distributed import Security

    cert, key = (str(Path(directory) / name) for name in (TLS_CERT, TLS_KEY))
    return Security(require_encryption=True, tls_ca_file=cert, tls_client_cert=cert, tls_client_key=key,
                    tls_scheduler_cert=cert, tls_scheduler_key=key, tls_worker_cert=cert, tls_worker_key=key)


def client_security(*, scheduler: str | None, scheduler_file: str | None):
    """The Security our client needs: None for a tcp:// scheduler (Dask's own configuration then applies); for a
    tls:// one the certificate in $CNTK_TLS_DIR, else in tls_dir(scheduler_file); UserError when neither has it."""
    address = scheduler or _address_in(scheduler_file)
    if not address.startswith("tls://"):
        return None
    named = os.environ.get("CNTK_TLS_DIR")
    directory = Path(named) if named else tls_dir(scheduler_file) if scheduler_file else None
    if directory is not None and (directory / TLS_CERT).is_file() and (directory / TLS_KEY).is_file():
        return tls_security(directory)
    import dask

    if not named and dask.config.get("distributed.comm.tls.client.cert", None):
        return None  # the user's own Dask TLS configuration
    where = directory if directory is not None else "$CNTK_TLS_DIR"
    raise UserError(f"the scheduler at {address} uses TLS, and its certificate ({TLS_CERT}, {TLS_KEY}) is not in "
                    f"{where}: use the scheduler file its cluster wrote (the certificate folder beside it), or set "
                    f"CNTK_TLS_DIR to that folder")


def _address_in(scheduler_file: str) -> str:
    """The address a scheduler file holds ('' when unreadable: the Client then says what is wrong)."""
    import json

    try:
        return str(json.loads(Path(scheduler_file).read_text()).get("address", ""))
    except (OSError, ValueError, AttributeError):
        return ""


@contextlib.contextmanager
def open_client(*, scheduler: str | None, scheduler_file: str | None, cluster: ClusterConfig, backend: str):
    """A Client on the given scheduler, else on an embedded local cluster that is shut down on exit.

    backend: 'cpu' or 'gpu' picks the kind of local workers; unused for an existing cluster.
    """
    from distributed import Client

    if scheduler or scheduler_file:
        # the execution loop needs a default client (without one Dask raises "No clients found")
        with connect(scheduler=scheduler, scheduler_file=scheduler_file, set_as_default=True) as client:
            yield client
        return
    local = local_cluster(cluster=cluster, backend=backend)
    client = Client(local)
    try:
        yield client
    finally:
        client.close()
        local.close()


# OpenBLAS threads spin for 2^28 cycles (~0.1 s) after each call by default, holding the cores the numba pass
# after a tile's matrix product (fc) needs: 1.7x slower at depth 21 measured. 2^20 cycles is ~0.4 ms.
BLAS_SPIN = "20"


def worker_env(cluster: ClusterConfig, *, n_workers: int) -> dict[str, str]:
    """Environment of a local worker process: numba and OpenBLAS get the worker's share of the cores
    (cluster.threads when given), OpenBLAS with a short spin (BLAS_SPIN), OpenMP one thread (the tile kernels
    parallelise with numba; BLAS and numba run one after the other)."""
    threads = str(cluster.threads or max(1, (os.cpu_count() or 1) // max(1, n_workers)))
    return {"NUMBA_NUM_THREADS": threads, "OPENBLAS_NUM_THREADS": threads, "OPENBLAS_THREAD_TIMEOUT": BLAS_SPIN,
            "OMP_NUM_THREADS": "1"}


def task_slots(cluster: ClusterConfig, *, backend: str) -> int:
    """Tile tasks one local worker runs at once (its Dask threads): cluster.slots, else GPU_SLOTS for
    backend 'gpu' and 1 for 'cpu'."""
    if cluster.slots is not None:
        return cluster.slots
    return GPU_SLOTS if backend == "gpu" else 1


def local_cluster(*, cluster: ClusterConfig, backend: str):
    """Worker processes on this machine with task_slots threads each, all with worker_env: one per GPU
    (dask-cuda) for the GPU backend when dask-cuda is installed (one plain worker when it cannot start: NVML),
    else cluster.workers CPU workers."""
    import dask

    options = {"threads_per_worker": task_slots(cluster, backend=backend), "dashboard_address": ":0",
               "silence_logs": logging.ERROR}
    cuda = None
    if backend == "gpu":
        try:
            from dask_cuda import LocalCUDACluster
            from dask_cuda.utils import get_n_gpus
        except ImportError:
            pass
        else:
            try:
                cuda = LocalCUDACluster, get_n_gpus()
            except Exception as exc:   # NVML unusable (pynvml.NVMLError): a driver without it, a sandbox
                return one_gpu_worker(cluster, exc)
    env = worker_env(cluster, n_workers=cuda[1] if cuda else cluster.workers)
    # The nanny's pre-spawn environment is in place when a worker process starts, before it imports anything (a
    # BLAS reads its thread settings when it loads; Dask's default there is one BLAS thread). The `env` option
    # arrives too late for that, and LocalCUDACluster replaces it with CUDA_VISIBLE_DEVICES alone.
    pre_spawn = {**dask.config.get("distributed.nanny.pre-spawn-environ", {}), **env}
    # The nanny sets that environment in its own process, this one: restore ours, or numba here would meet a
    # changed NUMBA_NUM_THREADS at its next compile ("Cannot set NUMBA_NUM_THREADS ... once the threads have been
    # launched").
    ours = {key: os.environ.get(key) for key in pre_spawn}
    try:
        with dask.config.set({"distributed.nanny.pre-spawn-environ": pre_spawn}):
            if cuda:
                try:
                    return cuda[0](**options)
                except Exception as exc:   # the same met while it starts (device memory, CPU affinity)
                    return one_gpu_worker(cluster, exc)
            from distributed import LocalCluster

            return LocalCluster(n_workers=cluster.workers, processes=True, env=env, **options)
    finally:
        for key, value in ours.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def one_gpu_worker(cluster: ClusterConfig, exc: Exception):
    """A plain local cluster of one worker with the GPU worker's task slots, when dask-cuda cannot start its own
    (said on stderr); the tiles' backend stays 'gpu'."""
    print(f"backend gpu: dask-cuda could not start its cluster ({type(exc).__name__}: {exc}); using a plain "
          f"local cluster with one GPU worker", file=sys.stderr, flush=True)
    one = dataclasses.replace(cluster, workers=1, slots=task_slots(cluster, backend="gpu"))
    return local_cluster(cluster=one, backend="cpu")


def register_gpu_plugin(client) -> None:
    """Per-worker GPU set-up, when the GPU backend ships its plugin."""
    try:
        from cntk_gram.workers.gpu_plugin import GPUSetup
    except ImportError:
        return
    client.register_plugin(GPUSetup())


def resolve_here(name: str) -> str:
    """'auto' | 'cpu' | 'gpu' -> the backend usable in this process ('cpu' or 'gpu')."""
    from cntk_gram.workers.backends import resolve_backend

    try:
        return resolve_backend(name)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise UserError(f"backend {name!r} is not available here: {exc}") from None


def resolve_on_cluster(client, name: str) -> str:
    """'auto' is decided by a worker (the client's machine may have no GPU): one that has joined, else, while none
    has (worker jobs still queued), each tile's own worker when the tile starts: then 'auto' is returned and passed
    on to the tile tasks (tasks.decide_backend). 'cpu' and 'gpu' are returned as given. Never waits for workers."""
    if name != "auto" or not client.nthreads():
        return name
    try:
        return client.submit(resolve_here, name, pure=False).result(timeout=WORKER_ASK_S)
    except TimeoutError:  # the worker left meanwhile
        return name
