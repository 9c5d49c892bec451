"""Start a Dask scheduler here and SLURM GPU workers through dask-jobqueue, from deploy/jobqueue.yaml.

    python deploy/jobqueue_cluster.py --jobs 8 --scheduler-file runs/scheduler.json --config CONFIG
    python deploy/jobqueue_cluster.py --jobs 8 --scheduler-file runs/scheduler.json   # then `cntk submit` yourself

Keep this process alive (tmux, or its own long sbatch job): it owns the scheduler and keeps `--jobs` worker jobs
queued, replacing each job that reaches its walltime. With --config it also submits CONFIG's missing tiles and, once
every tile has its completion record, queues the solve job (deploy/slurm/solve.sbatch: the report lands in
<store>-report/), stops the workers and exits. Without it, it runs until Ctrl-C.

TLS is on: the scheduler and the workers use this run's certificate, made in the private folder beside the
scheduler file (`cntk tls`); `cntk` commands given that scheduler file find it. CNTK_TLS=off opts out.
"""
import argparse
import json
import os
import subprocess
import time
from pathlib import Path

import dask
import yaml

PROFILE = Path(__file__).with_name("jobqueue.yaml")
SOLVE_JOB = Path(__file__).parent / "slurm" / "solve.sbatch"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4, help="worker jobs (= GPUs) to keep queued")
    parser.add_argument("--profile", type=Path, default=PROFILE, help="dask-jobqueue YAML profile")
    parser.add_argument("--scheduler-file", type=Path, default=Path("runs/scheduler.json"))
    parser.add_argument("--config", help="submit this config, queue its solve job once its store is complete, exit")
    parser.add_argument("--solve-device", choices=("gpu", "cpu"), default="gpu",
                        help="device of the solve job (gpu: on a node with --gres=gpu:1)")
    parser.add_argument("--poll", type=float, default=60, help="seconds between two looks at the store")
    args = parser.parse_args()

    from dask_jobqueue import SLURMCluster  # the [cluster] extra

    from cntk_gram.pipeline.cluster import make_tls, tls_dir, tls_security

    if os.environ.get("CNTK_TLS", "on") not in ("on", "off"):
        parser.error(f"CNTK_TLS must be 'on' or 'off', not {os.environ['CNTK_TLS']!r}")
    tls = {}
    if os.environ.get("CNTK_TLS", "on") == "on":  # this run's own certificate
        tls = {"security": tls_security(make_tls(tls_dir(args.scheduler_file), new=True)), "protocol": "tls://"}
    dask.config.update(dask.config.config, yaml.safe_load(args.profile.read_text()), priority="new")
    cluster = SLURMCluster(**tls)
    cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
    args.scheduler_file.parent.mkdir(parents=True, exist_ok=True)
    args.scheduler_file.write_text(json.dumps({"address": cluster.scheduler_address}))
    print(f"scheduler {cluster.scheduler_address}; scheduler file {args.scheduler_file}", flush=True)
    print(cluster.job_script(), flush=True)
    if args.config is None:
        while True:  # adapt() runs in the background; Ctrl-C stops the scheduler and cancels the jobs
            time.sleep(60)
    try:
        solve_when_complete(args.config, args)
    finally:
        cluster.close()  # cancels the worker jobs


def solve_when_complete(config_path: str, args) -> None:
    """Submit the config's tiles, wait (by its completion records) until the store is complete, queue the solve job."""
    from cntk_gram import load_config, submit
    from cntk_gram.pipeline.store import tile_status

    config = load_config(config_path)
    summary = submit(config, scheduler_file=str(args.scheduler_file))
    print(f"submitted {summary['tiles_submitted']} of {summary['tiles_total']} tiles of {summary['store']}", flush=True)
    while len(tile_status(summary["store"])[0]) < summary["tiles_total"]:
        time.sleep(args.poll)
    gres = ["--gres=gpu:1"] if args.solve_device == "gpu" else []
    env = {**os.environ, "CNTK_STORE": summary["store"], "CNTK_SOLVE_DEVICE": args.solve_device}
    job = subprocess.run(["sbatch", "--parsable", "--export=ALL", *gres, str(SOLVE_JOB)], env=env, check=True,
                         capture_output=True, text=True).stdout.strip()
    report = Path(summary["store"]).with_suffix("") if summary["store"].endswith(".zarr") else Path(summary["store"])
    print(f"store complete; solve job {job}: the report will be in {report}-report/", flush=True)


if __name__ == "__main__":
    main()
