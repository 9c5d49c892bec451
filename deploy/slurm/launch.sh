#!/usr/bin/env bash
# One command for a whole SLURM run: a scheduler job, ROUNDS consecutive rounds of worker jobs
# (each round starts when the previous one ends, so the work outlives any single walltime; a round that finds the
# store complete ends at once), the final solve job after the last round, then `cntk submit`, which returns at
# once. Watch it with `cntk status STORE`; the accuracies land in STORE-report/results.json (runs/x.zarr ->
# runs/x-report/).
#
#   deploy/slurm/launch.sh CONFIG [NODES] [ROUNDS]      (run from the repository root)
#
# Extra sbatch options per kind of job (word-split): CNTK_SCHEDULER_SBATCH, CNTK_WORKER_SBATCH (e.g.
# "--time=12:00:00 --partition=gpu"), CNTK_SOLVE_SBATCH. CNTK_WORKER_KIND=cpu runs CPU workers and a CPU solve.
set -euo pipefail
config=${1:?usage: deploy/slurm/launch.sh CONFIG [NODES] [ROUNDS]}
nodes=${2:-1}
rounds=${3:-3}
source deploy/slurm/common.sh
export CNTK_SCHEDULER_FILE=${CNTK_SCHEDULER_FILE:-runs/scheduler.json}
export CNTK_WORKER_KIND=${CNTK_WORKER_KIND:-gpu}
[[ -f $config ]] || { echo "Error: no config file $config" >&2; exit 2; }
[[ $nodes =~ ^[1-9][0-9]*$ && $rounds =~ ^[1-9][0-9]*$ ]] \
  || { echo "Error: NODES and ROUNDS must be whole numbers >= 1, got '$nodes' '$rounds'" >&2; exit 2; }

# the store every job watches (workers end once it is complete, the solve job reads it); a bad config stops here
CNTK_STORE=$(python -c '
import sys
from pathlib import Path
from cntk_gram.pipeline.config import load_config
from cntk_gram.pipeline.errors import UserError
try:
    print(Path(load_config(sys.argv[1]).store).resolve())
except (UserError, OSError) as exc:
    sys.exit(f"Error: {exc}")' "$config")
export CNTK_STORE
mkdir -p runs/slurm "$(dirname "$CNTK_SCHEDULER_FILE")"
if [[ ${CNTK_TLS:-on} != off ]]; then
  cntk tls "$CNTK_SCHEDULER_FILE" --new > /dev/null  # this run's own certificate and key
fi

# shellcheck disable=SC2086  # the CNTK_*_SBATCH variables are lists of options
scheduler_job=$(sbatch --parsable --export=ALL ${CNTK_SCHEDULER_SBATCH:-} deploy/slurm/scheduler.sbatch)
export CNTK_SCHEDULER_JOB=$scheduler_job
echo "scheduler job $scheduler_job"
previous=""
for (( round = 0; round < rounds; round++ )); do
  dependency=(--dependency="after:${scheduler_job}")
  [[ -n $previous ]] && dependency=(--dependency="afterany:${previous}")
  # shellcheck disable=SC2086
  previous=$(sbatch --parsable --export=ALL --array="0-$(( nodes - 1 ))" "${dependency[@]}" \
    ${CNTK_WORKER_SBATCH:-} deploy/slurm/workers.sbatch)
  echo "worker round $round: job $previous"
done

solve_options=()
if [[ $CNTK_WORKER_KIND == gpu ]]; then solve_options=(--gres=gpu:1); fi
# shellcheck disable=SC2086
solve_job=$(CNTK_SOLVE_DEVICE=$([[ $CNTK_WORKER_KIND == gpu ]] && echo gpu || echo cpu) \
  sbatch --parsable --export=ALL --dependency="afterany:${previous}" "${solve_options[@]}" \
  ${CNTK_SOLVE_SBATCH:-} deploy/slurm/solve.sbatch)
echo "solve job $solve_job: the report will be in ${CNTK_STORE%.zarr}-report/"

# however long the scheduler job waits in the queue; `cntk submit` itself never waits for workers
wait_for_scheduler "$scheduler_job" "$CNTK_SCHEDULER_FILE"
cntk submit "$config" --scheduler-file "$CNTK_SCHEDULER_FILE"
echo "submitted; the store fills while the jobs run. Cancel with: cntk cancel $CNTK_STORE --scheduler-file $CNTK_SCHEDULER_FILE"
