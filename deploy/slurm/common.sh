#!/usr/bin/env bash
# Helpers sourced by the sbatch scripts: walltime arithmetic and waiting for the scheduler file.
# Pure bash plus squeue; every function can be tried outside SLURM (tests/test_deploy.py does).

# SLURM duration ("[D-]HH:MM:SS", "MM:SS", "MM", "UNLIMITED") -> whole seconds on stdout.
duration_to_seconds() {
  local text=$1 days=0 rest h=0 m=0 s=0
  case $text in
    ""|UNLIMITED|INVALID|NOT_SET) echo 0; return ;;
  esac
  if [[ $text == *-* ]]; then days=${text%%-*}; rest=${text#*-}; else rest=$text; fi
  IFS=: read -r -a parts <<< "$rest"
  case ${#parts[@]} in
    1) if [[ $text == *-* ]]; then h=${parts[0]}; else m=${parts[0]}; fi ;;
    2) if [[ $text == *-* ]]; then h=${parts[0]}; m=${parts[1]}; else m=${parts[0]}; s=${parts[1]}; fi ;;
    3) h=${parts[0]}; m=${parts[1]}; s=${parts[2]} ;;
    *) echo "duration_to_seconds: cannot read '$text'" >&2; return 1 ;;
  esac
  echo $(( 10#$days * 86400 + 10#$h * 3600 + 10#$m * 60 + 10#$s ))
}

# Seconds left before SLURM kills this job (0 when unknown or unlimited).
slurm_seconds_left() {
  if [[ -n ${SLURM_JOB_END_TIME:-} ]]; then
    echo $(( SLURM_JOB_END_TIME - $(date +%s) ))
    return
  fi
  if [[ -n ${SLURM_JOB_ID:-} ]] && command -v squeue > /dev/null; then
    duration_to_seconds "$(squeue --noheader --jobs "$SLURM_JOB_ID" --format %L)"
    return
  fi
  echo 0
}

# Worker lifetime in seconds: leave MARGIN for the last tile and STAGGER for the random spread
# (dask draws the real lifetime from lifetime +/- stagger), never below 60 s. 0 = no lifetime.
worker_lifetime_seconds() {
  local left=$1 margin=$2 stagger=$3
  if (( left <= 0 )); then echo 0; return; fi
  local lifetime=$(( left - margin - stagger ))
  (( lifetime < 60 )) && lifetime=60
  echo "$lifetime"
}

# Wait until FILE exists (the scheduler writes it once it listens); fail after TIMEOUT seconds.
wait_for_file() {
  local file=$1 timeout=$2 waited=0
  until [[ -s $file ]]; do
    if (( waited >= timeout )); then
      echo "no scheduler file $file after ${timeout}s: is the scheduler job running?" >&2
      return 1
    fi
    sleep 5
    waited=$(( waited + 5 ))
  done
}
