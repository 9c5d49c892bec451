"""deploy/: the scripts parse, their walltime arithmetic is right, the compose file and the jobqueue profile
are well-formed, and the README's local multi-process path runs end to end."""
from __future__ import annotations

import asyncio
import os
import re
import shutil
import stat
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from cluster_procs import REPO, cntk, cntk_json, proc_env, wait_for_records, wait_until, write_config
from small_stores import assert_tiles_assemble_to_whole

DEPLOY = REPO / "deploy"
SCRIPTS = sorted(p for p in DEPLOY.rglob("*") if p.suffix in (".sh", ".sbatch"))


def bash(script: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", script], cwd=REPO, env={**os.environ, **env}, text=True,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_there_are_slurm_scripts():
    names = {p.name for p in SCRIPTS}
    assert {"scheduler.sbatch", "workers.sbatch", "common.sh", "launch.sh", "local-cluster.sh"} <= names


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: str(p.relative_to(DEPLOY)))
def test_scripts_pass_bash_n(script):
    result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("text, seconds", [
    ("1-02:03:04", 1 * 86400 + 2 * 3600 + 3 * 60 + 4),
    ("08:09:10", 8 * 3600 + 9 * 60 + 10),
    ("05:06", 5 * 60 + 6),
    ("45", 45 * 60),
    ("2-07", 2 * 86400 + 7 * 3600),
    ("09:08:07", 9 * 3600 + 8 * 60 + 7),  # leading zeros are not octal
    ("UNLIMITED", 0),
])
def test_duration_to_seconds(text, seconds):
    result = bash(f"source deploy/slurm/common.sh && duration_to_seconds {text}")
    assert result.returncode == 0, result.stderr
    assert int(result.stdout) == seconds


@pytest.mark.parametrize("left, margin, stagger, expected", [
    (4 * 3600, 900, 120, 4 * 3600 - 900 - 120),
    (600, 900, 120, 60),      # never below a minute
    (0, 900, 120, 0),         # unknown walltime: no lifetime
])
def test_worker_lifetime_seconds(left, margin, stagger, expected):
    result = bash(f"source deploy/slurm/common.sh && worker_lifetime_seconds {left} {margin} {stagger}")
    assert int(result.stdout) == expected


def _stub_bin(tmp_path: Path) -> Path:
    """srun that prints its arguments and the lifetime config instead of starting workers."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text('#!/usr/bin/env bash\necho "ARGS $*"\n'
                    'echo "DURATION ${DASK_DISTRIBUTED__WORKER__LIFETIME__DURATION:-unset}"\n'
                    'echo "RESTART ${DASK_DISTRIBUTED__WORKER__LIFETIME__RESTART:-unset}"\n')
    srun.chmod(srun.stat().st_mode | stat.S_IEXEC)
    return bin_dir


@pytest.mark.parametrize("kind", ["cpu", "gpu"])
def test_workers_sbatch_retires_workers_before_the_walltime(tmp_path, kind):
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text("{}")
    walltime, before = 4 * 3600, int(time.time())
    end = before + walltime
    env = dict(PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_END_TIME=str(end), CNTK_SCHEDULER_FILE=str(scheduler_file),
               CNTK_WORKER_KIND=kind, CNTK_WALLTIME_MARGIN="900", CNTK_LIFETIME_STAGGER="120")
    result = bash("bash deploy/slurm/workers.sbatch", **env)
    after = int(time.time()) + 1
    assert result.returncode == 0, result.stderr
    duration = int(re.search(r"DURATION (\d+)s", result.stdout).group(1))
    # the script read the clock somewhere between `before` and `after`, however long it took
    assert (end - after) - 900 - 120 <= duration <= (end - before) - 900 - 120
    assert "RESTART False" in result.stdout
    args = re.search(r"ARGS (.*)", result.stdout).group(1)
    assert f"--scheduler-file {scheduler_file}" in args
    if kind == "gpu":  # three task slots per GPU worker, one per CPU worker (docs: deploy/README.md)
        assert args.startswith("dask cuda worker") and "--nthreads 3" in args
    else:
        assert args.startswith("dask worker") and "--nthreads 1" in args
        assert f"--lifetime {duration}s --lifetime-stagger 120s --no-lifetime-restart" in args


def test_workers_sbatch_periodic_restart(tmp_path):
    scheduler_file = tmp_path / "scheduler.json"
    scheduler_file.write_text("{}")
    env = dict(PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO),
               SLURM_JOB_END_TIME=str(int(time.time()) + 48 * 3600), CNTK_SCHEDULER_FILE=str(scheduler_file),
               CNTK_WORKER_KIND="cpu", CNTK_RESTART_EVERY="06:00:00")
    result = bash("bash deploy/slurm/workers.sbatch", **env)
    assert result.returncode == 0, result.stderr
    assert "DURATION 21600s" in result.stdout and "RESTART True" in result.stdout
    assert "--lifetime 21600s" in result.stdout and "--lifetime-restart" in result.stdout


def test_workers_sbatch_fails_clearly_without_a_scheduler(tmp_path):
    env = dict(PATH=f"{_stub_bin(tmp_path)}:{os.environ['PATH']}", SLURM_SUBMIT_DIR=str(REPO),
               CNTK_SCHEDULER_FILE=str(tmp_path / "missing.json"), CNTK_SCHEDULER_WAIT="0")
    result = bash("bash deploy/slurm/workers.sbatch", **env)
    assert result.returncode != 0
    assert "no scheduler file" in result.stderr and "ARGS" not in result.stdout


def test_compose_file_has_a_scheduler_and_gpu_workers():
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    services = compose["services"]
    assert "8786" in " ".join(services["scheduler"]["command"])
    assert {"--tls-ca-file", "--tls-cert", "--tls-key"} <= set(services["scheduler"]["command"])  # TLS only
    assert services["tls"]["command"][:2] == ["cntk", "tls"]
    assert "tls" in services["scheduler"]["depends_on"]
    gpu_workers = [s for name, s in services.items() if name.startswith("gpu-worker")]
    assert len(gpu_workers) >= 2
    device_ids = []
    for worker in gpu_workers:
        (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
        assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
        device_ids += device["device_ids"]
        assert worker["command"][:3] == ["dask", "cuda", "worker"]
        assert worker["command"][worker["command"].index("--nthreads") + 1] == "3"  # three task slots
        assert "tls://scheduler:8786" in worker["command"] and "--tls-cert" in worker["command"]
        assert "scheduler" in worker["depends_on"]
        assert worker["build"]["dockerfile"] == "deploy/Dockerfile"
    assert len(set(device_ids)) == len(device_ids), "two workers on one GPU"
    for service in services.values():  # every relative host path exists from deploy/
        for volume in service.get("volumes", []):
            host = volume.split(":")[0]
            if not host.startswith("$"):
                assert (DEPLOY / host).resolve().exists(), volume


def _compose_command() -> list[str] | None:
    """`docker compose` (plugin) or the standalone `docker-compose`; `config` needs no Docker engine."""
    docker = shutil.which("docker")
    if docker and subprocess.run([docker, "compose", "version"], capture_output=True).returncode == 0:
        return [docker, "compose"]
    standalone = shutil.which("docker-compose")
    return [standalone] if standalone else None


def test_compose_config_validates(tmp_path):
    """The compose file passes the real validator (CI installs docker-compose; users without either skip)."""
    command = _compose_command()
    if command is None:
        pytest.skip("neither `docker compose` nor `docker-compose` is installed (.ci/run installs docker-compose)")
    result = subprocess.run(command + ["-f", str(DEPLOY / "compose.yaml"), "config", "--quiet"],
                            capture_output=True, text=True, env={**os.environ, "CNTK_RUNS": str(tmp_path)})
    assert result.returncode == 0, result.stderr


def test_dockerfile_builds_from_cuda_runtime_with_the_gpu_extra():
    text = (DEPLOY / "Dockerfile").read_text()
    base = re.search(r"ARG CUDA_IMAGE=(\S+)", text).group(1)
    assert base.startswith("nvidia/cuda:") and "-runtime-" in base
    assert re.search(r'pip install .*"\.\[gpu[,\]]', text)
    for source in re.findall(r"^COPY (.+) \S+$", text, flags=re.M):
        for name in source.split():
            assert (REPO / name).exists() or name == "README.md", f"COPY source {name} missing"


def _seconds(text: str) -> int:
    value, unit = re.fullmatch(r"(\d+)([smh])", text).groups()
    return int(value) * {"s": 1, "m": 60, "h": 3600}[unit]


def _slurm_profile() -> dict:
    return yaml.safe_load((DEPLOY / "jobqueue.yaml").read_text())["jobqueue"]["slurm"]


def test_jobqueue_profile_retires_workers_before_the_walltime():
    profile = _slurm_profile()
    args = profile["worker-extra-args"]
    lifetime = _seconds(args[args.index("--lifetime") + 1])
    stagger = _seconds(args[args.index("--lifetime-stagger") + 1])
    h, m, s = map(int, profile["walltime"].split(":"))
    assert lifetime + stagger + 600 <= h * 3600 + m * 60 + s  # ten minutes left for the last tile
    assert "--gres=gpu:1" in profile["job-extra-directives"] and profile["processes"] == 1
    assert profile["cores"] // profile["processes"] == 3  # worker threads: three task slots per GPU


def test_jobqueue_profile_makes_a_job_script(tmp_path, monkeypatch):
    """dask-jobqueue (in the test extra, as in the [cluster] one) reads the profile into a SLURM job script."""
    SLURMCluster = pytest.importorskip(
        "dask_jobqueue", reason="dask-jobqueue is not installed: pip install -e .[test] brings it").SLURMCluster
    import dask

    profile = _slurm_profile()
    monkeypatch.chdir(tmp_path)  # the profile's log-directory is created relative to here
    with dask.config.set({f"jobqueue.slurm.{key}": value for key, value in profile.items()}):
        with SLURMCluster(scheduler_options={"port": 0, "dashboard_address": ":0"}) as cluster:
            script = cluster.job_script()
    assert "--lifetime" in script and "#SBATCH --gres=gpu:1" in script


def test_readme_has_the_sections_a_cluster_user_follows():
    text = (DEPLOY / "README.md").read_text()
    headings = [line.lower() for line in text.splitlines() if line.startswith("#")]
    for topic in ("slurm", "dask-jobqueue", "docker", "existing dask cluster", "local", "fault"):
        assert any(topic in h for h in headings), topic
    for path in re.findall(r"deploy/[\w./-]+\.(?:sh|sbatch|yaml|py)", text) + ["deploy/Dockerfile"]:
        assert (REPO / path).exists(), path


def test_local_cluster_script_runs_submit_to_completion(tmp_path, cifar_format_root):
    """The README's local path: deploy/local-cluster.sh, `cntk submit`, the client exits, `cntk status`.
    Workers retire every 3-5 s (--lifetime 4s --lifetime-stagger 1s --lifetime-restart) and come back."""
    cluster_dir = tmp_path / "cluster"
    env = proc_env(CNTK_WORKER_LIFETIME="4s", CNTK_LIFETIME_STAGGER="1s")
    start = subprocess.run(["bash", "deploy/local-cluster.sh", "start", "2", str(cluster_dir)], cwd=REPO,
                           env=env, capture_output=True, text=True)
    try:
        assert start.returncode == 0, start.stderr
        store = tmp_path / "g.zarr"
        config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=store, train=40, test=20,
                              tile=10, depths=(3, 30))
        submitted = cntk("submit", config, "--scheduler-file", cluster_dir / "scheduler.json")
        assert submitted.returncode == 0, submitted.stdout
        assert "submitted 18 of 18 tiles" in submitted.stdout
        wait_for_records(store, 18)
        status = cntk_json("status", store)
        assert (status["tiles_done"], status["tiles_total"]) == (18, 18), status
        # the tiles may all finish within the first lifetime: wait for a retirement (it comes every 3-5 s)
        wait_until(lambda: "worker-lifetime-reached" in (cluster_dir / "workers.log").read_text(),
                   what="a worker retired by its lifetime")
        workers_log = (cluster_dir / "workers.log").read_text()
    finally:
        subprocess.run(["bash", "deploy/local-cluster.sh", "stop", str(cluster_dir)], cwd=REPO, env=env)
    assert "worker-lifetime-reached" in workers_log  # the lifetime flags reached the workers
    _assert_store_matches_whole_block(store, n_train=40, depths=(3, 30))


def test_local_cluster_refuses_clients_without_its_certificate(tmp_path, cifar_format_root):
    """TLS on by default: the scheduler file holds a tls:// address, the certificate folder beside it is private, and
    a plain Client (on tls:// or tcp:// at the same host and port) or one with another certificate cannot reach the
    scheduler, while `cntk submit` and `cntk cancel`, given only the scheduler file, can. CNTK_TLS=off opts out."""
    from distributed import Client, Security

    cluster_dir = tmp_path / "cluster"
    env = proc_env()
    start = subprocess.run(["bash", "deploy/local-cluster.sh", "start", "1", str(cluster_dir)], cwd=REPO, env=env,
                           capture_output=True, text=True)
    try:
        assert start.returncode == 0, start.stderr
        address = yaml.safe_load((cluster_dir / "scheduler.json").read_text())["address"]
        assert address.startswith("tls://")
        tls = cluster_dir / "scheduler-tls"
        assert stat.S_IMODE(tls.stat().st_mode) == 0o700
        assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tls.iterdir()} == {"cert.pem": 0o600,
                                                                                  "key.pem": 0o600}
        plain = address.replace("tls://", "tcp://")
        async def connect(target, security):   # asynchronous: no IO-loop thread to start (slow on a busy machine)
            async with Client(target, security=security, timeout="5s", asynchronous=True, set_as_default=False):
                pass

        for target, security in ((address, None), (plain, None), (address, Security.temporary())):
            with pytest.raises((OSError, TimeoutError, TypeError, ValueError)):
                asyncio.run(connect(target, security))
        store = tmp_path / "g.zarr"
        config = write_config(tmp_path / "c.yaml", data_root=cifar_format_root, store=store, train=20, test=10,
                              tile=10, backend="auto")
        submitted = cntk("submit", config, "--scheduler-file", cluster_dir / "scheduler.json")
        assert submitted.returncode == 0, submitted.stdout
        wait_for_records(store, 5)
        cancelled = cntk("cancel", store, "--scheduler-file", cluster_dir / "scheduler.json")
        assert cancelled.returncode == 0 and "queued tasks dropped" in cancelled.stdout, cancelled.stdout
        moved = tmp_path / "elsewhere.json"  # the same address without the certificate folder beside it
        moved.write_text((cluster_dir / "scheduler.json").read_text())
        refused = cntk("submit", config, "--scheduler-file", moved)
        assert refused.returncode == 2 and "uses TLS" in refused.stdout and "Traceback" not in refused.stdout
    finally:
        subprocess.run(["bash", "deploy/local-cluster.sh", "stop", str(cluster_dir)], cwd=REPO, env=env)
    off = subprocess.run(["bash", "deploy/local-cluster.sh", "start", "1", str(cluster_dir)], cwd=REPO,
                         env={**env, "CNTK_TLS": "off"}, capture_output=True, text=True)
    try:
        assert off.returncode == 0, off.stderr
        assert yaml.safe_load((cluster_dir / "scheduler.json").read_text())["address"].startswith("tcp://")
    finally:
        subprocess.run(["bash", "deploy/local-cluster.sh", "stop", str(cluster_dir)], cwd=REPO, env=env)


def _assert_store_matches_whole_block(store: Path, *, n_train: int, depths) -> None:
    """The Gram assembled from tiles equals the CPU kernel on the whole block at once (small_stores)."""
    import zarr

    from cntk_gram.workers.cpu import tile_kernels

    whole = tile_kernels(zarr.open_array(store, path="inputs/images", mode="r")[:], None, archs=("vanilla",),
                         max_depth=max(depths))
    expected = {(key, depth, None): stack[depth - 2] for key, stack in whole.items() for depth in depths}
    assert_tiles_assemble_to_whole(store, expected, n_train=n_train, rtol=1e-5, atol_scale=1e-6)
