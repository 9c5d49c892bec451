#!/usr/bin/env bash
# One command for a whole SLURM run: scheduler job, ROUNDS consecutive rounds of worker jobs
# (each round starts when the previous one ends, so the work outlives any single walltime),
# then `cntk submit`, which returns at once. Watch it with `cntk status STORE`.
#
#   deploy/slurm/launch.sh CONFIG [NODES] [ROUNDS]      (run from the repository root)
set -euo pipefail
config=${1:?usage: deploy/slurm/launch.sh CONFIG [NODES] [ROUNDS]}
nodes=${2:-1}
rounds=${3:-3}
source deploy/slurm/common.sh
export CNTK_SCHEDULER_FILE=${CNTK_SCHEDULER_FILE:-runs/scheduler.json}
mkdir -p runs/slurm

scheduler_job=$(sbatch --parsable --export=ALL deploy/slurm/scheduler.sbatch)
echo "scheduler job $scheduler_job"
previous=""
for (( round = 0; round < rounds; round++ )); do
  dependency=(--dependency="after:${scheduler_job}")
  [[ -n $previous ]] && dependency=(--dependency="afterany:${previous}")
  previous=$(sbatch --parsable --export=ALL --array="0-$(( nodes - 1 ))" "${dependency[@]}" \
    deploy/slurm/workers.sbatch)
  echo "worker round $round: job $previous"
done

wait_for_file "$CNTK_SCHEDULER_FILE" "${CNTK_SCHEDULER_WAIT:-1800}"
cntk submit "$config" --scheduler-file "$CNTK_SCHEDULER_FILE"
echo "submitted; the store fills while the jobs run. Cancel with: cntk cancel STORE --scheduler-file $CNTK_SCHEDULER_FILE"
