"""Start a Dask scheduler here and SLURM GPU workers through dask-jobqueue, from deploy/jobqueue.yaml.

    python deploy/jobqueue_cluster.py --jobs 8 --scheduler-file runs/scheduler.json
    cntk submit CONFIG --scheduler-file runs/scheduler.json      # in another shell

Keep this process alive (tmux, or its own long sbatch job): it owns the scheduler and keeps
`--jobs` worker jobs queued, replacing each job that reaches its walltime.
"""
import argparse
import json
import time
from pathlib import Path

import dask
import yaml

PROFILE = Path(__file__).with_name("jobqueue.yaml")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=4, help="worker jobs (= GPUs) to keep queued")
    parser.add_argument("--profile", type=Path, default=PROFILE, help="dask-jobqueue YAML profile")
    parser.add_argument("--scheduler-file", type=Path, default=Path("runs/scheduler.json"))
    args = parser.parse_args()

    from dask_jobqueue import SLURMCluster  # the [cluster] extra

    dask.config.update(dask.config.config, yaml.safe_load(args.profile.read_text()), priority="new")
    cluster = SLURMCluster()
    cluster.adapt(minimum_jobs=args.jobs, maximum_jobs=args.jobs)
    args.scheduler_file.parent.mkdir(parents=True, exist_ok=True)
    args.scheduler_file.write_text(json.dumps({"address": cluster.scheduler_address}))
    print(f"scheduler {cluster.scheduler_address}; scheduler file {args.scheduler_file}")
    print(cluster.job_script())
    while True:  # adapt() runs in the background; Ctrl-C stops the scheduler and cancels the jobs
        time.sleep(60)


if __name__ == "__main__":
    main()
